"""ToE with the Hugging Face ``transformers`` ``Trainer``.

    import token_select
    from ToE.integrations.hf import ToECallback
    model = ViTForImageClassification(config)
    toe = token_select.attach(model, token_select.TokenSelect(expansion_step=[0, 1, 2]))
    Trainer(model=model, args=args, train_dataset=..., callbacks=[ToECallback(toe)]).train()

``token_select.attach`` puts the operator in the model (ViT, DeiT, Dinov2, CLIP vision, ...);
this callback only moves it from stage to stage as the epochs go by, like the ``for epoch``
loop's ``toe.update_current_stage(epoch)`` in a plain PyTorch loop.
"""

from __future__ import annotations

from typing import Optional

try:
    from transformers import TrainerCallback
except ImportError as error:  # pragma: no cover - exercised only without transformers
    raise ImportError(
        "ToE.integrations.hf needs Hugging Face transformers (and accelerate, for its Trainer): "
        "pip install -e '.[hf]'  (or: pip install transformers accelerate)"
    ) from error

from token_select import TokenSelect

__all__ = ["ToECallback"]


class ToECallback(TrainerCallback):
    """Sets the ToE stage from the trainer's epoch at the start of every epoch.

    ``token_select``: the operator ``token_select.attach`` returned; ``None`` takes the
    ``token_select`` attribute of the model the trainer trains (``attach`` sets it).

    The epoch is ``int(state.epoch)`` (the trainer's epoch is a float: ``2.5`` halfway through
    the third epoch), so a run resumed from a checkpoint gets the stage of the epoch it resumes
    in. The trainer's float can fall short of the whole epoch it just finished (``1.9999``) when
    the last optimiser step of an epoch is not at its last batch; the callback counts the epochs
    it has begun as well and takes the larger of the two, so a stage is never entered late.
    ``epoch`` (the epoch last begun) and ``stage`` are kept on the callback.
    """

    def __init__(self, token_select: Optional[TokenSelect] = None) -> None:
        self.token_select = token_select
        self.epoch: Optional[int] = None
        self.stage: Optional[int] = None

    def _operator(self, model) -> TokenSelect:
        if self.token_select is not None:
            return self.token_select
        operator = getattr(model, "token_select", None)
        if not isinstance(operator, TokenSelect):
            raise ValueError("ToECallback() without an operator needs a model with ToE attached "
                             "(token_select.attach(model, ...)); pass the operator instead")
        return operator

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        # resuming: the epochs already done; a fresh run: None, the first epoch is 0
        self.epoch = int(state.epoch) - 1 if state.epoch else None
        return control

    def on_epoch_begin(self, args, state, control, model=None, **kwargs):
        epoch = int(state.epoch or 0)
        if self.epoch is not None:
            epoch = max(epoch, self.epoch + 1)
        self.epoch = epoch
        self.stage = self._operator(model).update_current_stage(epoch)
        return control
