"""Datasets: the community folder format, positives, the synthetic city and Grain input pipelines."""

from jaxvpr.data.format import (
    DatasetError,
    ImageFolder,
    ImageNameError,
    ImageRecord,
    PathList,
    SplitDataset,
    aggregate_utm,
    list_images,
    parse_image_name,
    read_image_folder,
    read_image_list,
    read_split,
)
from jaxvpr.data.positives import PositiveFinder, heading_difference, is_positive
