"""The diffusers community port of Matryoshka Diffusion Models -> our checkpoint directory.

diffusers' ``examples/community/matryoshka.py`` re-implements ml-mdm's NestedUNet in its
own module tree (``MatryoshkaUNet2DConditionModel`` inside ``NestedUNet2DConditionModel``)
and publishes one full model per nesting level as ``unet/nesting_level_{0,1,2}/`` with a
``config.json`` and ``diffusion_pytorch_model.safetensors`` (or ``.bin``). Its layers
compute what ml-mdm's do, with these differences of form, undone here:

* attention projections are ``nn.Linear`` (``attn1.to_qkv``, ``proj_out``, the
  feed-forward's ``linear_gelu.proj`` / ``linear_out``) where ml-mdm and we have 1x1
  convolutions: the weights gain two unit dimensions;
* a stage's attention layers after one ResNet are ``attentions.j.transformer_blocks.k``,
  ours ``attn.(j*L + k)``; the mid block is ``resnets.0, attentions.0, resnets.1``;
* the innermost UNet's time sinusoid is ``[cos, sin]`` when ``flip_sin_to_cos`` (its
  default), ours ``[sin, cos]``: the two halves of ``time_embedding.linear_1``'s input
  columns are swapped, which leaves its output unchanged.

The port hard-codes what ml-mdm hard-codes (32-group norms in attention, the pooled text
embedding of the innermost UNet); every option of ``config.json`` that would make it
compute something our NestedUNet cannot is refused with :class:`DiffusersMdmError`.
Weight files are read without running code: safetensors, or torch's ``weights_only``
unpickler for ``.bin``.
"""

from .config import DiffusersMdmError, model_from_diffusers
from .convert import PortConversion, convert_diffusers_mdm
from .weights import convert_port_state_dict, diffusers_key, read_port_weights

__all__ = [
    "DiffusersMdmError",
    "PortConversion",
    "convert_diffusers_mdm",
    "convert_port_state_dict",
    "diffusers_key",
    "model_from_diffusers",
    "read_port_weights",
]
