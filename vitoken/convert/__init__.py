"""Published ViT weights into vitoken: timm models, big_vision `.npz` and MAE checkpoints."""
from vitoken.convert.big_vision import from_big_vision, to_big_vision
from vitoken.convert.mae import from_mae
from vitoken.convert.timm import from_timm
