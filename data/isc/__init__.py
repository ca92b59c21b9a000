"""ISC 2021 (DISC21) data for the isc workflow.

Modules (import the one you need; ``import data.isc`` itself stays cheap):

* :mod:`.layout`      - the DISC21 layout: image lists with ids, ground-truth CSVs, launch-time check;
* :mod:`.synthetic`   - ``generate(root)``: a small synthetic set in that layout;
* :mod:`.augment`     - copy-detection edits (overlays, text, colour, crops...) in numpy/OpenCV;
* :mod:`.datasets`    - torch datasets: training views, ground-truth pairs, extraction images;
* :mod:`.postprocess` - database-side augmentation, negative embedding subtraction, faiss kNN;
* :mod:`.metrics`     - micro average precision and recall at precision 0.9 (competition rules);
* :mod:`.download`    - the real data from the competition bucket.
"""
