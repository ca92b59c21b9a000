"""Data side of the product workflow (Visual Product Recognition 2023): the synthetic set in the
real layouts (``synthetic``), the per-category preparation of the Amazon-review pairs
(``amazon``), image datasets (``datasets``) and mAP@1000 (``metrics``).

Import the submodules directly; this package imports nothing itself, so the launch path stays
free of numpy and torch.
"""

#: the seed's nine Amazon-review categories, in its order (the synthetic set uses the first n)
CATEGORIES = ("AMAZON_FASHION", "All_Beauty", "Appliances", "Clothing_Shoes_and_Jewelry", "Electronics",
              "Home_and_Kitchen", "Office_Products", "Sports_and_Outdoors", "Toys_and_Games")
