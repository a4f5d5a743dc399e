"""inference_engine"""
