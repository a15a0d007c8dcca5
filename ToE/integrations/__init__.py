"""Integrations of ToE with other training frameworks.

- ``ToE.integrations.hf``: a Hugging Face ``transformers`` ``TrainerCallback`` that sets the ToE
  stage from the trainer's epoch (needs the ``hf`` extra: ``pip install -e ".[hf]"``).

Attaching the operator to a model is ``token_select.attach`` (timm, torchvision and the Hugging
Face ViT families); nothing here is needed for a plain PyTorch loop.
"""
