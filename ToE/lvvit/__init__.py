"""LV-ViT with token labelling and Token Expansion; importing it registers lvvit_{t,s,m,l,digits} and the
digits teacher digits_cnn in timm's registry."""

from ToE.lvvit import model, teacher  # noqa: F401  (registers the models)
