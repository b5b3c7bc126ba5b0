"""Small trainers that write specan run directories (DESIGN Contract 1)."""
