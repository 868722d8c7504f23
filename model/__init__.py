"""PyTorch side of streamrec: SASRec-style model, datasets, training, evaluation, baselines.

model/ knows nothing of Kafka, RocksDB or stream/.
"""
