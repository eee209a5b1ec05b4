"""Self-contained HTML pages (`html`) and every figure (`figures`)."""
