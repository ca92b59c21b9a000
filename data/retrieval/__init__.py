"""Retrieval pieces the metric-learning workflows share (isc, vsc, later product).

Import the module you need (``import data.retrieval`` itself stays cheap):

* :mod:`.knn`      - exact faiss kNN (on every GPU when faiss sees one), L2 normalisation;
* :mod:`.dba`      - database-side augmentation;
* :mod:`.nes`      - negative embedding subtraction;
* :mod:`.micro_ap` - micro average precision over a ranked list of (pair, score) predictions.
"""
