"""fedtune's federated-learning core: pure Python, numpy and scikit-learn (no Prefect, no
MLflow). A plain loop over these functions (:func:`fl.simulation.simulate`) gives the same
model as the Prefect flow."""

__version__ = "0.1.0"
