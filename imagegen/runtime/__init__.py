"""The CPU bit-exactness and speed machinery, in one place, below the model layer:

batching.py  fixed micro-batches and their one-time rounding checks (run_fixed_batch, exact_rows, wide_rows)
engine.py    sampling engines: torch, or the network as one ONNX graph in onnxruntime (use_engine)
host.py      process settings: the vector-math warm-up at import, glibc's freed-memory thresholds in train()

(oneDNN's packed weights belong to the layers that use them: nets/layers.py.) This package's __init__
imports nothing, so the model layer can use batching.py without loading the engine and its exporter.
"""
