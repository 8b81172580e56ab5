"""Lightning modules: a :class:`~flexact.FlexActNetwork` for classification and regression.

:class:`FlexActModule` is the template (loss = task + α·KL, optimizer injected);
:class:`FlexActClassifier` and :class:`FlexActRegressor` fill in its loss and metrics hooks.
"""

from flexact.modules.base import FlexActModule
from flexact.modules.classification import FlexActClassifier
from flexact.modules.regression import FlexActRegressor

__all__ = ["FlexActClassifier", "FlexActModule", "FlexActRegressor"]
