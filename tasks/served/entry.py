"""MLflow "models from code" entry for the registered model: no pickled Python objects.

MLflow runs this file when the model is loaded (`mlflow.pyfunc.load_model`); the `tasks`
and `conf` packages travel with the model as code paths, the weights as an artifact.
"""

import mlflow
import pandas as pd
from mlflow.pyfunc import PythonModel

from tasks.served.predictor import Predictor


class AccelflowClassifier(PythonModel):
    """Scores raw feature rows (a DataFrame with the training columns) → class labels."""

    def load_context(self, context):
        self.predictor = Predictor(context.artifacts["bundle"])

    def predict(self, context, model_input: pd.DataFrame, params=None):
        # an array, not a Series: building a Series of strings costs more than the network
        return self.predictor.predict_frame(model_input)


mlflow.models.set_model(AccelflowClassifier())
