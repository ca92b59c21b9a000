"""Model code for the workflows (TimeSformer backbone, score heads, losses).

Import the submodules directly (``from models.diving import build_diving_model``): this package
imports nothing itself, so listing workflows never pulls in torch.
"""
