"""What every trainable of this project shares, on top of the data layer: utterances on the device
and the one input path (:mod:`.utterances`), noise at a measured SNR (:mod:`.noise`), SER metrics
(:mod:`.metrics`), the robustness evaluation (:mod:`.robustness`) and the corpus hooks of the
trainable contract (:mod:`.corpus_hooks`)."""
