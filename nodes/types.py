"""Custom socket types shared by the dataset and training nodes.

IP2P_EDIT_ROWS carries a `list[comfyui_ip2p.dataset.records.EditRow]` between nodes. Rows from
GenerateEditInstructions have no images yet (input_image/edited_image are None); P2PPairGenerator fills them
with PIL images; CLIPDirectionFilter fills the clip_sim_* scores; SaveEditDataset writes them.
IP2P_EDIT_DATASET is a handle to a dataset on disk, `{"path": str, "format": str}`, so training streams rows
instead of holding every image in memory.
"""

from comfy_api.v0_0_2 import io

EditRows = io.Custom("IP2P_EDIT_ROWS")
EditDataset = io.Custom("IP2P_EDIT_DATASET")
