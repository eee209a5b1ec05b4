"""The run folder: creating and numbering it (`folder`), writing a finished run (`write`), reading one back
(`run.Run`), and its report page (`report_page`)."""
