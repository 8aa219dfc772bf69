"""Sparse autoencoders, and only them: architectures (``model``), checkpoint formats (``io`` for
SAELens' layout, ``formats/`` for the others), where an SAE comes from (``sources``), the
activations they read (``activations``, ``text_encoder``), training (``train``, ``train_config``,
``calibrate``, ``finetune``), evaluation (``evaluate``, ``output_scores``), latent statistics
(``stats``), probes on latents (``probes``) and the SAEs we ship (``pretrained/``). Models come
from ``saesteer.modeling`` below; plans, hooks and engines live in ``saesteer.steering`` above."""
