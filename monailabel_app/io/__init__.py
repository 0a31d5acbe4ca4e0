"""Reading images: radiographs, CT volumes, DICOM; writing a reading in the input's geometry."""
