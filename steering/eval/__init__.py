"""The steering evaluation harness (``saesteer eval-steering``): concepts, the sentence-encoder
judge, strength sweeps and their reports. Built on the serving runtime (``steering.plan``,
``steering.hooks``, ``steering.generate``); the runtime never imports it."""
