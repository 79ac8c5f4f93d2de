"""The reference receiver named by the ingest issue: a bare pynetdicom storage SCP in one
process whose C-STORE handler writes the raw data set bytes to a file with ``fdatasync``.

    python bench/bare_pynetdicom_scp.py PORT FOLDER

It accepts every storage SOP class with pynetdicom's default transfer syntaxes and the
largest PDUs (maximum PDU length 0: unlimited), never decodes a data set and keeps nothing
else: no validation, no index, no folder fsync. ``bench/ingest.py`` measures it as context
next to rtauto, which does all of those.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from pynetdicom import AE, StoragePresentationContexts, evt


def main() -> None:
    port, folder = int(sys.argv[1]), Path(sys.argv[2])
    folder.mkdir(parents=True, exist_ok=True)

    def on_store(event: evt.Event) -> int:
        uid = str(event.request.AffectedSOPInstanceUID)
        fd = os.open(folder / uid, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            os.write(fd, event.request.DataSet.getbuffer())
            os.fdatasync(fd)
        finally:
            os.close(fd)
        return 0x0000

    ae = AE(ae_title="BARE")
    ae.supported_contexts = StoragePresentationContexts
    ae.maximum_pdu_size = 0
    ae.start_server(("127.0.0.1", port), block=True, evt_handlers=[(evt.EVT_C_STORE, on_store)])


if __name__ == "__main__":
    main()
