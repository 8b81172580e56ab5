"""Lightning modules: a FlexAct head on any backbone, for classification and regression."""

from flexact.modules.base import FlexActModule, strip_classifier
from flexact.modules.classification import FlexActClassifier
from flexact.modules.regression import FlexActRegressor

__all__ = ["FlexActClassifier", "FlexActModule", "FlexActRegressor", "strip_classifier"]
