"""Pure numerical pieces: calibration, scores, the diagnosis rules, saliency, units. Numbers in, numbers out."""
