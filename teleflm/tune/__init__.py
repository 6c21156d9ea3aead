"""Tuning on a proxy, by the muP rules of teleflm.mup: the coordinate check that proves them wired
right, the hyper-parameter search, its report, the transfer to a wider (or deeper) model, and the
short scored runs they (and the loss-prediction ladder, teleflm.scaling) are made of."""
