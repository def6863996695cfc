"""Published ViT weights into vitoken (timm models, big_vision `.npz`, MAE and VideoMAE
checkpoints), and an image ViT inflated into a video one."""
from vitoken.convert.big_vision import from_big_vision, to_big_vision
from vitoken.convert.inflate import inflate
from vitoken.convert.mae import from_mae
from vitoken.convert.timm import from_timm
from vitoken.convert.videomae import from_videomae
