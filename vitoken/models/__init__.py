"""Model definitions: the ViT backbone, its attention, and the token reducers."""
from vitoken.models.vit import Model, VisionTransformer
from vitoken.models.variants import decode_variant
