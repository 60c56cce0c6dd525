"""Moving weights between this project's MosaicBERT and the layouts other code loads.

Layouts (mosaicbert_ds.interop.layouts):
    hf-bert          transformers' BertForMaskedLM / BertForPreTraining / BertModel
    mosaicbert-hub   the paper authors' MosaicBERT (mosaicml/mosaic-bert-base on the hub)
    mosaicbert-ds    this project's own folders (MosaicBertForMaskedLM.save_pretrained)

`read_model_folder(path)` recognises the layout from the state dict's keys and returns this
project's config and state dict, converted exactly (the same function, the same logits), or
raises UserError naming the first key that is missing, unexpected or mis-shaped.
"""

from .folder import ConvertedModel, read_model_folder, write_model_folder
from .layouts import LAYOUTS

__all__ = ["ConvertedModel", "read_model_folder", "write_model_folder", "LAYOUTS"]
