"""Zone configuration: allocation of a zone to a POM server ("Save") and its application ("Save and Apply")."""
