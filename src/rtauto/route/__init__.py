"""Routing: destinations (DICOM nodes, folders), delivery records and replay."""

from rtauto.route.deliveries import (
    DeliveryItem,
    DeliveryLedger,
    ResolvedDestination,
    deliver,
    resolve_destination,
)
from rtauto.route.dicom import DICOM_DESTINATION, DicomDestinationConfig, TlsConfig, send_dicom
from rtauto.route.folder import FOLDER_DESTINATION, FolderDestinationConfig, send_folder
from rtauto.route.replay import ReplayResult, replay_job
from rtauto.route.steps import (
    RouteDicomParams,
    RouteFolderParams,
    RouteSendParams,
    route_dicom,
    route_folder,
    route_send,
)

__all__ = [
    "DICOM_DESTINATION",
    "FOLDER_DESTINATION",
    "DeliveryItem",
    "DeliveryLedger",
    "DicomDestinationConfig",
    "FolderDestinationConfig",
    "ReplayResult",
    "ResolvedDestination",
    "RouteDicomParams",
    "RouteFolderParams",
    "RouteSendParams",
    "TlsConfig",
    "deliver",
    "replay_job",
    "resolve_destination",
    "route_dicom",
    "route_folder",
    "route_send",
    "send_dicom",
    "send_folder",
]
