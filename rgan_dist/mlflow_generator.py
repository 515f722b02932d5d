"""The code MLflow runs to load a logged generator (MLflow's "models from code"): the model folder holds this
file and the safetensors weights, and no pickle, in the spirit of `torch.load(weights_only=True)`."""

import mlflow.models

from rgan_dist.mlflow_model import GeneratorModel

mlflow.models.set_model(GeneratorModel())
