"""Where things live: the images (``data``), storage URIs on local disk or S3 (``storage``), the
folders of a sweep (``locations``), MLflow records (``tracking``) and the dashboard's saved view
and trial pictures (``dashboard``)."""
