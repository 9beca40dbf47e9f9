"""Data: tokenizer and special tokens, images, interleaved sequences and label masking, the
synthetic shapes world, sources and grain pipelines. Knows nothing of train, inference or eval."""

from xattn_vlm.data.images import ImageError, load_image, preprocess_image, preprocess_video
from xattn_vlm.data.sequence import IGNORE_INDEX, build_example, supervised_mask
from xattn_vlm.data.shapes.tokenizer import default_tokenizer
from xattn_vlm.data.tokenizer import Tokenizer
from xattn_vlm.data.features import CachedFeaturesTransform, FeatureCache, build_feature_cache
from xattn_vlm.data.pipeline import (BatchIterator, Component, ExampleTransform, MixtureIterator,
                                     batch_iterator, mixture_iterator)
from xattn_vlm.data.sources import BadRecordError, ImageRef
