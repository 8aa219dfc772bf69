"""Serving on vLLM (a first piece): per-request SAE steering inside upstream vLLM.

- ``export``: the default GGUF model saved as a folder of float32 safetensors, which vLLM reads;
- ``plugin``: the ``vllm.general_plugins`` entry point (``register``), a steered Llama
  architecture and the worker extension that maps each token of a step to its request.

Importing this package does not import vLLM (the modules that need it import it themselves).
"""
