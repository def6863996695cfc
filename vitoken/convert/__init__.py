"""Published ViT weights into vitoken: timm models and big_vision `.npz` checkpoints."""
from vitoken.convert.big_vision import from_big_vision, to_big_vision
from vitoken.convert.timm import from_timm
