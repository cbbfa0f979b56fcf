"""objective"""
