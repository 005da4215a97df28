"""t2i_export: exports Stable Diffusion 1.x / 2.x / XL + T2I-Adapter checkpoints to the ONNX graph set that
t2i-rt runs (contract: docs/manifest.md)."""

__version__ = "0.1.0"

OPSET = 17
FORMAT_VERSION = 4
# What the runtime reads: format 2 (no vae_encoder, no GraphSpec `batch`, tokenizer `.json` only), 3 and
# 4 (built-in tokenizers).
READABLE_FORMAT_VERSIONS = (2, 3, 4)
