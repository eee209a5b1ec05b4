"""Reading image folders: scan (plain data), profile (statistics), pipeline (tf.data)."""
