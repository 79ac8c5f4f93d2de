"""Built-in routing plugin: the ``dicom``, ``dicomweb`` and ``folder`` destination types and
the ``route.dicom``, ``route.folder`` and ``route.send`` steps."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from rtauto.hooks import hookimpl
from rtauto.route.dicom import DICOM_DESTINATION
from rtauto.route.dicomweb import DICOMWEB_DESTINATION
from rtauto.route.folder import FOLDER_DESTINATION
from rtauto.route.steps import (
    ROUTE_OUTPUTS,
    RouteDicomParams,
    RouteFolderParams,
    RouteSendParams,
    route_dicom,
    route_folder,
    route_send,
)
from rtauto.steps import StepType


@hookimpl
def rtauto_register_destinations(register: Callable[[Any], None]) -> None:
    register(DICOM_DESTINATION)
    register(DICOMWEB_DESTINATION)
    register(FOLDER_DESTINATION)


@hookimpl
def rtauto_register_steps(register: Callable[[Any], None]) -> None:
    register(
        StepType(
            name="route.dicom",
            run=route_dicom,
            params=RouteDicomParams,
            description="send DICOM objects to a DICOM node (C-STORE), with alternates",
            outputs=ROUTE_OUTPUTS,
        )
    )
    register(
        StepType(
            name="route.folder",
            run=route_folder,
            params=RouteFolderParams,
            description="copy artifacts (DICOM objects, reports) or inputs into a folder",
            outputs=ROUTE_OUTPUTS,
        )
    )
    register(
        StepType(
            name="route.send",
            run=route_send,
            params=RouteSendParams,
            description="send to a destination of any registered type",
            outputs=ROUTE_OUTPUTS,
        )
    )
