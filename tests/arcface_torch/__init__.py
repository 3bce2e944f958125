"""Our transcriptions of insightface's recognition/arcface_torch modules (written from
their behaviour, CPU only): the other side of the PartialFC drop-in tests. The package
and module names are insightface's, so that PartialFC recognizes these classes as it
recognizes insightface's own."""
