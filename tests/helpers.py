"Helpers shared by the tests (and the notebooks' examples): test data and independent computations, not package API."
import numpy as np


def numpy_calibration_error(probabilities, labels, bins: int = 15) -> np.ndarray:
    """Expected calibration error per column, written out: bin b holds the probabilities in [b/bins, (b+1)/bins) (1.0 in
    a bin of its own, as torchmetrics does), and each bin adds |share of positives - mean probability| x its share of images."""
    errors = []
    for p, y in zip(np.asarray(probabilities, float).T, np.asarray(labels, float).T):
        which = np.floor(p * bins).astype(int)
        errors.append(sum(abs(y[which == b].mean() - p[which == b].mean()) * (which == b).mean() for b in np.unique(which)))
    return np.array(errors)
