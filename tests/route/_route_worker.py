"""Runs one ``route.dicom`` step as the engine's worker process would (for the crash test).

Usage: ``python _route_worker.py SPEC.json``; SPEC holds store_url, job_id, port, files,
attempt, max_attempts and workdir. Prints the step's outputs as JSON.
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

import pydicom

from rtauto.config import Destination, Settings
from rtauto.route.steps import RouteDicomParams, route_dicom
from rtauto.steps import Artifact, PreviousStep, Provenance, StepContext, StudyInputs


def main(spec_path: str) -> None:
    spec = json.loads(Path(spec_path).read_text())
    artifacts = []
    for name in spec["files"]:
        ds = pydicom.dcmread(name, stop_before_pixels=True)
        artifacts.append(
            Artifact(Path(name), "CT", modality="CT", sop_instance_uid=str(ds.SOPInstanceUID))
        )
    workdir = Path(spec["workdir"])
    ctx = StepContext(
        job_id=spec["job_id"],
        step_id="send",
        step_type="route.dicom",
        attempt=spec["attempt"],
        workdir=workdir,
        job_dir=workdir.parent,
        study=StudyInputs("1.2.3", "P", ()),
        previous={"contour": PreviousStep("contour", "ok", {}, tuple(artifacts))},
        provenance=Provenance("0", "w", "0" * 64, spec["job_id"], "send", "route.dicom", "r", "0"),
        settings=Settings(home=workdir.parent),
        destinations={
            "tps": Destination.model_validate(
                {"ae_title": "COUNTER", "host": "127.0.0.1", "port": spec["port"]}
            )
        },
        logger=logging.getLogger("rtauto.step.send"),
        store_url=spec["store_url"],
        max_attempts=spec["max_attempts"],
    )
    result = route_dicom(ctx, RouteDicomParams(destination="tps"))
    print(json.dumps(result.outputs))


if __name__ == "__main__":
    main(sys.argv[1])
