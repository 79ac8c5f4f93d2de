from rtauto.testing import storescu, write_ct_series


def test_orthanc(orthanc, tmp_path):
    s = write_ct_series(tmp_path / "ct", slices=5)
    storescu(orthanc.dicom_port, s.files, called_ae="ORTHANC")
    assert sorted(orthanc.sop_instance_uids()) == sorted(s.sop_instance_uids)


def test_recv(receiving_scp, tmp_path):
    s = write_ct_series(tmp_path / "ct", slices=3)
    storescu(receiving_scp.port, s.files, called_ae="RECEIVER")
    assert sorted(receiving_scp.received) == sorted(s.sop_instance_uids)
