#!/usr/bin/env python3
"""Prints the scalars of the TensorBoard event files in a folder, read with TensorBoard's
own reader, as JSON {tag: [[step, value], ...]} (lntune's interop tests)."""
import json
import sys

from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

acc = EventAccumulator(sys.argv[1])
acc.Reload()
print(json.dumps({t: [[e.step, e.value] for e in acc.Scalars(t)] for t in acc.Tags()["scalars"]}))
