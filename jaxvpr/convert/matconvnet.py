"""The original NetVLAD release (MatConvNet ``.mat``) as an OpenIBL-layout state dict.

    python -m jaxvpr.convert from-torch --model netvlad_vgg16_4096 --weights Pitts30K_struct.mat --out ckpt/netvlad
    python -m jaxvpr.convert from-torch --model netvlad_vgg16_32768 --weights Pitts30K_struct.mat --out ckpt/netvlad_32k

Arandjelovic et al. (CVPR 2016) released MatConvNet networks ``vd16_{pitts30k,tokyoTM}_conv5_3_vlad_preL2_intra_white``
whose custom layers are MATLAB classes. hloc and VPR-methods-evaluation load them as re-saved with every layer a
plain struct (``Pitts30K_struct.mat`` / ``TokyoTM_struct.mat``, https://cvg-data.inf.ethz.ch/hloc/netvlad/, made
with uzh-rpg/netvlad_tf_open's ``net_class2struct.m``), read with
``scipy.io.loadmat(path, struct_as_record=False, squeeze_me=True)``. The file holds one variable ``net``:

=====================  ===================================  ==============================================
``net.layers[i]``      MATLAB layer (``name``, ``type``)     here (OpenIBL ``EmbedNetPCA`` names)
=====================  ===================================  ==============================================
0..28                  VGG16 conv1_1 .. conv5_3; convs at   ``base_model.base.{i}.weight`` = ``weights{1}``
                       the torchvision ``features`` indices  (H, W, in, out) -> (out, in, H, W);
                       (ReLU and max-pool swapped, which     ``.bias`` = ``weights{2}`` (out,)
                       commutes); no ReLU after conv5_3
29                     ``preL2`` (normalize)                 the head's L2 over channels
30                     ``vlad:core`` (custom), ``K`` = 64    ``net_vlad.conv.weight`` = ``weights{1}``
                       ``weights{1}`` assignment (D, K),     (D, K) -> (K, D, 1, 1), no bias;
                       ``weights{2}`` *minus* the centres    ``net_vlad.centroids`` = -``weights{2}``
                       (D, K): the layer sums a_k (x + c)    (D, K) -> (K, D)
31, 32                 intra-normalisation, ``postL2``       the head's intra-L2 and L2
33                     ``WPCA`` (conv), ``weights{1}``       ``pca_layer.weight`` (P, K*D, 1, 1), input
                       (1, 1, D*K, P), ``weights{2}`` (P,)   re-ordered (below); ``pca_layer.bias`` (P,)
34                     ``finalL2``                           the head's final L2
=====================  ===================================  ==============================================

Order of the VLAD vector: the MATLAB network (and hloc, which flattens its (B, D, K) sums) feeds the whitening
the 32768 values *dimension by dimension*, index ``d * K + k``; jaxvpr and OpenIBL flatten cluster by cluster,
``k * D + d``. The whitening's input rows are permuted accordingly, so the 4096-d descriptor equals hloc's; the
32768-d descriptor (``netvlad_vgg16_32768``) holds the same values as hloc's in the cluster-major order (same
distances, same retrieval).

Input: RGB in 0-255 minus ``net.meta.normalization.averageImage(1,1,:)`` (std 1). The releases store a 224x224x3
image whose pixels all equal [123.68, 116.779, 103.939] (Relja/netvlad#18; MATLAB and hloc read the first pixel),
which is the mean jaxvpr's ``caffe`` input subtracts, (0.48502, 0.45796, 0.40760) x 255, to within 0.001. The
converter checks the file's value against the model's and refuses a file that differs by more than
:data:`MEAN_TOLERANCE`.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np

VLAD_LAYER = 30  # net.layers index of ``vlad:core`` (hloc: layers[30])
WHITENING_LAYER = 33  # net.layers index of ``WPCA`` (hloc: layers[33])
NORMALIZE_LAYERS = (29, 31)  # preL2 and the intra-normalisation, the architecture the head assumes
MEAN_TOLERANCE = 0.01  # in 0-255 units: |averageImage(1,1,:) - the model's caffe mean x 255|


def load_matconvnet_net(path: str | os.PathLike) -> Any:
    """The ``net`` struct of a struct-ified MatConvNet file (attributes ``layers``, ``meta``)."""
    from scipy.io import loadmat

    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"MATLAB file not found: {path}")
    try:
        mat = loadmat(path, struct_as_record=False, squeeze_me=True)
    except (ValueError, TypeError, NotImplementedError, OSError) as err:  # v7.3 (HDF5) files: NotImplementedError
        raise ValueError(f"{path}: could not be read with scipy.io.loadmat: {err}") from err
    if "net" not in mat:
        names = sorted(k for k in mat if not k.startswith("__"))
        raise ValueError(f"{path}: a NetVLAD release holds a variable 'net'; found {names or 'nothing'}")
    net = mat["net"]
    if not hasattr(net, "layers"):
        raise ValueError(
            f"{path}: 'net' has no field 'layers' (fields: {_fields(net)}). If its layers are MATLAB objects, "
            "re-save it with every layer a struct (uzh-rpg/netvlad_tf_open matlab/net_class2struct.m), or use "
            "hloc's Pitts30K_struct.mat."
        )
    return net


def netvlad_state_dict(net: Any, model_cfg, source: str = "the .mat file") -> dict[str, np.ndarray]:
    """The OpenIBL-layout state dict (``base_model.base.*``, ``net_vlad.*``, ``pca_layer.*`` when
    ``pca_dim > 0``) of a NetVLAD MatConvNet ``net`` (see the module docstring for the mapping).

    ``model_cfg`` is a VGG16 + NetVLAD config with ``torch_layout='openibl'`` and ``input_norm='caffe'``
    (``netvlad_vgg16_32768``, ``netvlad_vgg16_4096``). Raises ``ValueError`` naming the layer or field
    that is missing or mis-shaped, or a mean image that differs from the model's.
    """
    from jaxvpr.convert.rules import expected_torch_shapes
    from jaxvpr.models import model_config
    from jaxvpr.models.registry import INPUT_NORMS
    from jaxvpr.models.vgg import VGG16_CONV_INDICES

    cfg = model_config(model_cfg)
    layout = (cfg.backbone, cfg.head, cfg.get("torch_layout"), cfg.get("input_norm"))
    if layout != ("vgg16", "netvlad", "openibl", "caffe"):
        raise ValueError(
            f"a NetVLAD MatConvNet file converts to a VGG16 + NetVLAD model with input_norm='caffe' and "
            f"torch_layout='openibl' (netvlad_vgg16_32768, netvlad_vgg16_4096); {cfg.name!r} is {cfg.backbone} + "
            f"{cfg.head}, input_norm={cfg.get('input_norm')!r}, torch_layout={cfg.get('torch_layout')!r}"
        )
    layers = np.atleast_1d(np.asarray(net.layers, dtype=object))
    needed = WHITENING_LAYER if cfg.pca_dim > 0 else VLAD_LAYER
    if len(layers) <= needed:
        what = "the whitening layer WPCA" if needed == WHITENING_LAYER else "the NetVLAD layer vlad:core"
        hint = " (a file without whitening converts to netvlad_vgg16_32768)" if needed == WHITENING_LAYER else ""
        raise ValueError(
            f"{source}: net.layers has {len(layers)} layers; {cfg.name!r} needs {what} in net.layers[{needed}]{hint}"
        )
    _check_mean(net, INPUT_NORMS["caffe"], source)
    for i in NORMALIZE_LAYERS:
        kind = getattr(layers[i], "type", "normalize")
        if kind != "normalize":
            raise ValueError(
                f"{source}: net.layers[{i}] ({_describe(layers[i])}) should be an L2 'normalize' layer; this is not "
                "the conv5_3 + preL2 + intra-normalised NetVLAD the model implements"
            )

    expected = expected_torch_shapes(cfg)
    state: dict[str, np.ndarray] = {}
    for i in VGG16_CONV_INDICES:
        out_ch, in_ch, kh, kw = expected[f"base_model.base.{i}.weight"]
        kernel, bias = _weights(layers, i, 2, source)
        _check_shape(kernel, (kh, kw, in_ch, out_ch), f"net.layers[{i}] ({_describe(layers[i])}) weights{{1}}", source)
        state[f"base_model.base.{i}.weight"] = np.ascontiguousarray(np.transpose(kernel, (3, 2, 0, 1)))
        state[f"base_model.base.{i}.bias"] = _vector(bias, out_ch, f"net.layers[{i}] weights{{2}}", source)

    num_clusters, dim = expected["net_vlad.centroids"]
    assignment, minus_centres = _weights(layers, VLAD_LAYER, 2, source)
    where = f"net.layers[{VLAD_LAYER}] ({_describe(layers[VLAD_LAYER])})"
    assignment = _matrix(assignment, (dim, num_clusters), f"{where} weights{{1}} (assignment)", source)
    minus_centres = _matrix(minus_centres, (dim, num_clusters), f"{where} weights{{2}} (-centres)", source)
    state["net_vlad.centroids"] = np.ascontiguousarray(-minus_centres.T)
    state["net_vlad.conv.weight"] = np.ascontiguousarray(assignment.T)[:, :, None, None]

    if cfg.pca_dim > 0:
        projection, offset = _weights(layers, WHITENING_LAYER, 2, source)
        where = f"net.layers[{WHITENING_LAYER}] ({_describe(layers[WHITENING_LAYER])})"
        projection = _matrix(projection, (dim * num_clusters, cfg.pca_dim), f"{where} weights{{1}}", source)
        # rows d*K + k (MATLAB/hloc) -> k*D + d (jaxvpr/OpenIBL)
        cluster_major = projection.reshape(dim, num_clusters, cfg.pca_dim).transpose(1, 0, 2)
        state["pca_layer.weight"] = cluster_major.reshape(num_clusters * dim, cfg.pca_dim).T[:, :, None, None]
        state["pca_layer.bias"] = _vector(offset, cfg.pca_dim, f"{where} weights{{2}}", source)
    return state


def read_netvlad_mat(path: str | os.PathLike, model_cfg) -> dict[str, np.ndarray]:
    """:func:`load_matconvnet_net` then :func:`netvlad_state_dict`: a NetVLAD release file
    (``Pitts30K_struct.mat``) as the state dict :func:`jaxvpr.convert.torch_to_variables` reads."""
    return netvlad_state_dict(load_matconvnet_net(path), model_cfg, source=os.fspath(path))


# --------------------------------------------------------------------------- helpers


def _fields(struct: Any) -> list[str]:
    return list(getattr(struct, "_fieldnames", []) or [])


def _describe(layer: Any) -> str:
    name, kind = getattr(layer, "name", None), getattr(layer, "type", None)
    return f"{name or '?'}, type {kind or '?'}"


def _weights(layers, index: int, count: int, source: str) -> list[np.ndarray]:
    """``net.layers{index+1}.weights`` as ``count`` float32 arrays (squeeze_me turns a 1x1 cell into its element)."""
    layer = layers[index]
    weights = getattr(layer, "weights", None)
    if weights is None:
        raise ValueError(f"{source}: net.layers[{index}] ({_describe(layer)}) has no field 'weights' "
                         f"(fields: {_fields(layer)})")
    if isinstance(weights, np.ndarray) and (weights.dtype == object or weights.size == 0):
        weights = list(weights.ravel())  # a cell array (empty for ReLU/pool layers)
    else:
        weights = [weights]
    if len(weights) < count:
        raise ValueError(
            f"{source}: net.layers[{index}] ({_describe(layer)}) holds {len(weights)} weight arrays, expected {count}"
        )
    return [np.asarray(w, dtype=np.float32) for w in weights[:count]]


def _check_shape(array: np.ndarray, shape: tuple[int, ...], what: str, source: str) -> None:
    if tuple(array.shape) != tuple(shape):
        raise ValueError(f"{source}: {what} has shape {list(array.shape)}, the model expects {list(shape)}")


def _matrix(array: np.ndarray, shape: tuple[int, int], what: str, source: str) -> np.ndarray:
    """A 2-d array, dropping MATLAB's leading singleton axes (1 x 1 x D x K when not squeezed)."""
    while array.ndim > 2 and array.shape[0] == 1:
        array = array[0]
    _check_shape(array, shape, what, source)
    return array


def _vector(array: np.ndarray, size: int, what: str, source: str) -> np.ndarray:
    if array.size != size:
        raise ValueError(f"{source}: {what} has shape {list(array.shape)}, the model expects [{size}]")
    return np.ascontiguousarray(array.reshape(size))


def _check_mean(net: Any, caffe_mean: tuple[float, float, float], source: str) -> None:
    """``averageImage(1,1,:)`` must be the model's caffe mean x 255 (see :data:`MEAN_TOLERANCE`)."""
    normalization = getattr(getattr(net, "meta", None), "normalization", None)
    image = getattr(normalization, "averageImage", None)
    if image is None:
        raise ValueError(f"{source}: net.meta.normalization.averageImage is missing; the NetVLAD releases store "
                         "the mean image their input was centred with there")
    image = np.asarray(image, dtype=np.float64)
    if image.ndim == 3 and image.shape[-1] == 3:
        pixel = image[0, 0]
    elif image.shape == (3,):
        pixel = image
    else:
        raise ValueError(f"{source}: net.meta.normalization.averageImage has shape {list(image.shape)}, "
                         "expected H x W x 3 (or 3 values)")
    model_mean = np.asarray(caffe_mean, np.float64) * 255.0
    gap = float(np.max(np.abs(pixel - model_mean)))
    if gap > MEAN_TOLERANCE:
        raise ValueError(
            f"{source}: its mean image averageImage(1,1,:) = {np.round(pixel, 3).tolist()} differs from the mean the "
            f"model subtracts (input_norm 'caffe': {np.round(model_mean, 3).tolist()}) by {gap:.3g} > {MEAN_TOLERANCE} "
            "(0-255 units), so its descriptors would not match the MATLAB network's. Only the releases with the "
            "VGG16 mean [123.68, 116.779, 103.939] (Pitts30K, TokyoTM) convert."
        )
