"""The models we steer, below the SAEs: loading a transformers LLM (a hub id, a folder or the
shipped GGUF) and its hook points (``lm``), text-to-image pipelines and their text encoder
(``diffusion``), and what makes CPU decoding fast: packed and lighter linear layers
(``cpu_kernels``), TorchScript decode blocks (``decode_script``) and a KV cache that appends in
place (``kv_cache``). Nothing here knows SAEs, plans or servers."""
