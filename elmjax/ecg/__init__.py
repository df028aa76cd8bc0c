"""ECG side of elmjax: reading recordings, preprocessing, perturbations, rendering and the
built-in synthetic ECG question-answering data set. Knows nothing of models."""
