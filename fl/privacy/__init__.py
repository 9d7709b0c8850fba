"""Client-level differential privacy: the mechanisms (:mod:`.mechanisms`: clipping, Gaussian
noise on a sum, adaptive clipping, the secret noise source), DP-FedAvg as a wrapper around any
sum-based strategy (:mod:`.dp_fedavg`), the accountant (:mod:`.accounting`) and a run's plan
(:mod:`.plan`: z, q and the fixed denominator, epsilon as reported)."""
