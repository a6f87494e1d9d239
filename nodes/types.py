"""Custom socket types shared by the dataset and training nodes.

IP2P_EDIT_ROWS carries a `Sequence[comfyui_ip2p.dataset.records.EditRow]` between nodes: a list, or from
LoadEditDataset a lazy dataset.source.RowSource (len, indexing, slicing and iteration read rows on demand), so
consumers use only those operations and never mutate it. Rows from GenerateEditInstructions have no images yet
(input_image/edited_image are None); P2PPairGenerator and EditRowsFromImages fill them with PIL images;
CLIPDirectionFilter fills the clip_sim_* scores; SaveEditDataset writes them.
IP2P_EDIT_DATASET is a handle to a dataset on disk, `{"path": str, "format": str, "mapping": dict[str, str] |
None}` (mapping: the column mapping of a "mapped" parquet dataset), so training streams rows instead of holding
every image in memory. Handles can come from a workflow file: nodes re-check them (pipeline/train.py
confined_dataset) before reading.
"""

from comfy_api.v0_0_2 import io

EditRows = io.Custom("IP2P_EDIT_ROWS")
EditDataset = io.Custom("IP2P_EDIT_DATASET")
