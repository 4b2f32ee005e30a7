"""Bring your own recordings: readers for the field's formats behind one interface, described by a spec file."""

from tinyml_dagster.recordings.readers import RecordingError, Table, read_table
from tinyml_dagster.recordings.recording import Recording, open_recording
from tinyml_dagster.recordings.spec import RecordingSpec, SpecError, load_spec, monitored_units, spec_from_dict

__all__ = [
    "Recording", "RecordingError", "RecordingSpec", "SpecError", "Table", "load_spec", "monitored_units",
    "open_recording", "read_table", "spec_from_dict",
]
